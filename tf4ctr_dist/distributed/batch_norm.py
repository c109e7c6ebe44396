"""BatchNorm whose training statistics cover the global batch, on any backend (gloo included).

Why it exists: with W workers each BatchNorm layer otherwise normalises over its own B/W rows.
At the paper's batch 1024 on two workers that is 512 rows, and the batch statistics are noisy
enough to cost measurable test AUC on Frappe (README "Results"). torch's
``nn.SyncBatchNorm`` does this job on CUDA only (its statistics kernels refuse CPU tensors), so
the CPU workers of this system need their own.

The maths is BatchNorm over the concatenation of every worker's rows (N = sum of the local
counts):

  forward:  mean = sum(x) / N, var = sum((x - mean)^2) / N (two all-reduces: the second pass
            subtracts the global mean, as torch's CPU BatchNorm does, rather than one pass of
            sum(x^2) - N mean^2, which cancels badly when |mean| >> std);
            y = (x - mean) / sqrt(var + eps) * weight + bias; the running variance gets the
            unbiased var * N / (N - 1), as in a single process.
  backward: with g = dL/dy and xhat the normalised input, one all-reduce of the per-feature
            sums of g and of g * xhat gives
            dL/dx = weight / sqrt(var + eps) * (g - sum(g) / N - xhat * sum(g * xhat) / N);
            dL/dweight and dL/dbias stay the local sums: data parallelism averages them with
            every other dense gradient, as it averages the local losses.

Each rank's loss is the mean over its own rows and the dense gradients are averaged over ranks,
so with equal local batches the result is the gradient of the global batch's mean loss, the same
as one process training on the whole batch (tests/distributed/test_cross_worker_batch_norm.py).

Evaluation (module.eval()) uses the running statistics and runs no collective. With the
statistics global, every rank's running mean and variance stay identical.

Where the compiled CPU kernels run the MLP blocks (BatchNorm -> ReLU -> dropout in one kernel,
modules/mlp.py), the layer keeps them: the kernel runs in two halves each way, and the layer pools
in between (``pool_moments``: each worker's column means and sums of squared deviations, one
all-gather, combined exactly; ``pool_sums``: backward's two column sums, one all-reduce). The
same maths as above, with the kernel's rounding; one collective fewer in forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dim but the feature dim 1: (B, C) -> [0]; (B, C, L) -> [0, 2]."""
    return [0] + list(range(2, x.dim()))


def _as_feature(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) -> broadcastable against x: (1, C) or (1, C, 1)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class _CrossWorkerBatchNorm(torch.autograd.Function):
    """Elementwise work in the input's dtype, one or two passes over (B, C[, L]) each way; the
    per-feature vectors that cross the network and combine the statistics in float64."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):  # type: ignore[override]
        dims = _reduce_dims(x)
        rows = x.numel() // x.shape[1]
        # (C + 1,): the per-feature sums and the row count, one all-reduce
        sums = torch.cat([x.sum(dims).double(), x.new_tensor([rows], dtype=torch.float64)])
        dist.all_reduce(sums, group=group)
        count = float(sums[-1])
        if count <= 1:
            raise ValueError(f"BatchNorm over the global batch needs more than one value per feature, got {count:g}")
        mean = sums[:-1] / count  # (C,) float64
        centred = x - _as_feature(mean.to(x.dtype), x)  # (B, C[, L])
        square_sums = centred.square().sum(dims).double()  # (C,)
        dist.all_reduce(square_sums, group=group)
        var = square_sums / count
        invstd = torch.rsqrt(var + eps)  # (C,) float64
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(running_var.dtype),
                                                    alpha=momentum)
        scale = invstd if weight is None else invstd * weight.double()  # (C,)
        if weight is None:
            y = centred * _as_feature(scale.to(x.dtype), x)
        else:  # y = centred * scale + bias
            y = torch.addcmul(_as_feature(bias.to(x.dtype), x), centred, _as_feature(scale.to(x.dtype), x))
        ctx.save_for_backward(centred, invstd, scale, weight)
        ctx.count, ctx.group = count, group
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        centred, invstd, scale, weight = ctx.saved_tensors
        dims = _reduce_dims(centred)
        # (2, C): sum(g) and sum(g * centred); sum(g * xhat) = invstd * the latter
        local = torch.stack([grad.sum(dims).double(), (grad * centred).sum(dims).double()])
        grad_weight = grad_bias = None
        if weight is not None:
            grad_bias = local[0].to(weight.dtype)
            grad_weight = (local[1] * invstd).to(weight.dtype)
        dist.all_reduce(local, group=ctx.group)
        mean_g = local[0] / ctx.count  # (C,)
        mean_gx = local[1] * invstd / ctx.count  # (C,): the global mean of g * xhat
        # dL/dx = scale * (g - mean(g) - xhat * mean(g * xhat)), xhat = centred * invstd
        grad_x = torch.addcmul(_as_feature((-scale * mean_g).to(grad.dtype), grad), grad,
                               _as_feature(scale.to(grad.dtype), grad))
        grad_x.addcmul_(centred, _as_feature((-scale * invstd * mean_gx).to(grad.dtype), grad))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def cross_worker_batch_norm(x: torch.Tensor, bn: "CrossWorkerBatchNorm1d") -> torch.Tensor:
    """Training-mode BatchNorm of x ((B, C) or (B, C, L)) over every rank of ``bn.group``, with
    nn.BatchNorm1d's bookkeeping (num_batches_tracked, the cumulative average when momentum is
    None)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _CrossWorkerBatchNorm.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps,
                                       bn.group)


# A leaf for torch.fx (TorchRec's pipeline traces the model): the module becomes a get_attr
# argument, so the process group never has to be an fx constant, and tracing never touches the
# buffers.
torch.fx.wrap("cross_worker_batch_norm")


class CrossWorkerBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d (same parameters, buffers and state_dict) whose training-mode statistics
    are those of the global batch across ``group`` (None: the default group). In eval mode, or
    without a process group of more than one rank, it is nn.BatchNorm1d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: Optional[dist.ProcessGroup] = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group = group

    def _pooling(self) -> bool:
        """Whether the training statistics need the other workers' rows."""
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._pooling():
            return super().forward(x)
        return cross_worker_batch_norm(x, self)

    # The compiled BatchNorm -> ReLU -> dropout kernel (modules/mlp.py) runs in two halves around
    # these (kernels.ops.StatisticsPool), instead of the eager ops of forward above.

    @property
    def statistics_pool(self) -> Optional["CrossWorkerBatchNorm1d"]:
        """This layer when its training statistics are pooled over workers, else None (the
        input's rows are the whole batch)."""
        return self if self._pooling() else None

    def pool_moments(self, count: int, moments: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(this worker's rows, (2, C) float64 column means and sums of squared deviations) ->
        the same over every worker's rows: one all-gather, then the exact pairwise combination
        (Chan et al.) in rank order, so every worker gets the same bits. Combining moments
        rather than raw sums keeps the sums of squares free of cancellation when |mean| >> std."""
        channels = moments.shape[1]
        local = torch.cat([moments.new_tensor([count]), moments.reshape(-1)])  # (1 + 2C,)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        table = torch.stack(parts)  # (W, 1 + 2C)
        counts = table[:, :1]  # (W, 1)
        means, squares = table[:, 1:1 + channels], table[:, 1 + channels:]  # (W, C) each
        total = counts.sum()
        mean = (counts * means).sum(0) / total  # (C,)
        squares = (squares + counts * (means - mean).square()).sum(0)  # (C,)
        return int(total), torch.stack([mean, squares])

    def pool_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-column sums ((2, C) float64) -> their sum over the workers (in place)."""
        dist.all_reduce(sums, group=self.group)
        return sums


def use_cross_worker_batch_norm(module: nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Replace every nn.BatchNorm1d in ``module`` (in place, before sharding: on ``meta`` too)
    with a CrossWorkerBatchNorm1d holding the same parameters and buffers; returns how many.

    The fused MLP blocks with the compiled CPU kernels run it in two halves around the layer's
    ``pool_moments`` and ``pool_sums``; every other BatchNorm runs the layer's forward (eager
    ops)."""
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm1d:
                continue
            new = CrossWorkerBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats, group=group, device="meta")
            # the same tensors (parameters and buffers, on meta or materialised): nothing is re-initialised
            new._parameters = child._parameters
            new._buffers = child._buffers
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced
