"""Plain MLP encoder used for MLP_s and MLP_c (spec section 3), and its fused CPU fast path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tf4ctr_dist.modules.init import init_linear

if TYPE_CHECKING:  # modules/ never loads the kernels itself: builders pass the handle in
    from tf4ctr_dist.kernels import CpuKernels

# Dropout keep masks on CPU are drawn 16 bits at a time: p is rounded to a multiple of 2**-16.
_MASK_BITS = 16
_MASK_LEVELS = 1 << _MASK_BITS

# Where dropout_keep_mask's random words come from: "sfc64" (numpy, seeded by torch; the default)
# or "torch" (torch's own generator, the slower earlier path; kept for A/B timing).
MASK_WORDS = ("sfc64", "torch")
# The eval-mode forward of the fused encoder (see MLPEncoder).
INFERENCE_PATHS = ("fused", "eager")


def dropout_threshold(p: float) -> tuple[int, float]:
    """(int16 threshold, scale) for a keep mask with P(drop) = round(p * 2**16) / 2**16.

    A 16-bit lane v (uniform over int16) is kept iff v >= threshold; kept values are scaled by
    1 / (1 - p_eff) so the expectation is exactly preserved for the rounded p_eff.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    drop_levels = round(p * _MASK_LEVELS)
    p_eff = drop_levels / _MASK_LEVELS
    return -(_MASK_LEVELS // 2) + drop_levels, 1.0 / (1.0 - p_eff)


def keep_mask_generator() -> np.random.SFC64:
    """numpy's SFC64 seeded by one draw from torch's generator: the source of a keep mask's words."""
    return np.random.SFC64(int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)))


def dropout_keep_mask(shape: Sequence[int], p: float, device: torch.device | str = "cpu",
                      words: str = "sfc64") -> torch.Tensor:
    """Bool keep mask of `shape`, P(keep) = 1 - p (p rounded to 2**-16), driven by torch's seed.

    Why not torch's generator: CPU `bernoulli_` draws one 32-bit number and a float conversion
    per element (~15 ns/element on one core) and even `random_` on int64 costs ~9 ns per 64-bit
    draw (mt19937, one thread): 3.6 ms for a (4096, 400) mask, ~10% of a bf16 training step.
    Here one draw from torch's generator seeds numpy's SFC64 (a small, fast generator that
    passes the standard statistical test batteries), which yields 64-bit words at ~2.4 ns each;
    each word gives four 16-bit lanes compared against a threshold. Deterministic under
    `torch.manual_seed` (and captured by torch's RNG state in checkpoints); same distribution up
    to the 2**-16 rounding of p, a different random stream from torch's dropout.
    words="torch": the 64-bit words from torch's generator instead (the earlier, slower path).
    """
    threshold, _ = dropout_threshold(p)
    n = 1
    for s in shape:
        n *= int(s)
    if words == "torch":
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
        return words.view(torch.int16)[:n].view(tuple(shape)) >= threshold
    words = keep_mask_generator().random_raw((n + 3) // 4)  # uint64, (ceil(n/4),)
    lanes = torch.from_numpy(words.view(np.int16)[:n]).view(tuple(shape))
    return (lanes >= threshold).to(device)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                   torch.float64: torch.int64}


def _positive(x: torch.Tensor) -> torch.Tensor:
    """x > 0 as a bool tensor. For a contiguous float tensor this compares the bits as a signed
    integer of the same width (IEEE floats order like their bit patterns for non-negative values;
    negatives and -0.0 have the sign bit set), which CPUs vectorise better than a float compare
    (notably for bfloat16). Differs from `x > 0` only for NaN with the sign bit clear."""
    int_dtype = _SAME_WIDTH_INT.get(x.dtype)
    if int_dtype is None or not x.is_contiguous():
        return x > 0
    return x.view(int_dtype) > 0


class _ReLUDropout(torch.autograd.Function):
    """y = relu(x) * keep / (1 - p) with one saved tensor k = (x > 0) & keep, scaled.

    Exact: given the same keep mask, outputs and input gradients equal
    `F.dropout(F.relu(x))`'s (relu's subgradient at 0 is 0 in both).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        k = torch.logical_and(_positive(x), keep)
        kf = k.view(torch.uint8).to(x.dtype).mul_(scale)  # uint8 -> float is vectorised, bool is not
        ctx.save_for_backward(kf)
        return x * kf

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (kf,) = ctx.saved_tensors
        return grad * kf, None, None


def relu_dropout(x: torch.Tensor, p: float, training: bool, keep: Optional[torch.Tensor] = None,
                 words: str = "sfc64") -> torch.Tensor:
    """ReLU then (in training, p > 0) inverted dropout; `keep` overrides the random mask (tests);
    `words`: where the mask's random words come from (`dropout_keep_mask`).

    CPU: one fused autograd op with the cheap 16-bit keep mask. Other devices: F.relu + F.dropout
    (their dropout kernels are already fused).
    """
    if not training or p <= 0.0:
        return F.relu(x)
    if keep is None and x.device.type != "cpu":
        return F.dropout(F.relu(x), p, True)
    _, scale = dropout_threshold(p)
    if keep is None:
        keep = dropout_keep_mask(x.shape, p, x.device, words)
    return _ReLUDropout.apply(x, keep, scale)


# A leaf for torch.fx (TorchRec's pipeline traces the model): autograd.Function.apply cannot
# take Proxies.
torch.fx.wrap("relu_dropout")


def linear_batch_norm_relu_dropout(
    x: torch.Tensor, linear: nn.Linear, bn: nn.BatchNorm1d, p: float, training: bool,
    kernels: Optional["CpuKernels"] = None, words: str = "sfc64",
) -> torch.Tensor:
    """relu_dropout(bn(linear(x)), p, training): x (B, in) -> (B, out).

    With ``kernels`` (the loaded CPU kernels, `tf4ctr_dist.kernels`), on CPU, float32, in
    training: the matmul, then one compiled kernel for the rest: the same BatchNorm math and
    running-statistics update, the same dropout masks as `relu_dropout` (the kernel runs the same
    SFC64 generator), and the Linear's bias handled inside BatchNorm, where it cancels: its
    gradient is exactly zero instead of rounding noise. A BatchNorm subclass whose statistics
    cover more rows than its input (over several workers) runs the kernel in halves around the
    pooling when it offers a ``statistics_pool`` (a `kernels.ops.StatisticsPool`, or None where
    the input's own rows are the batch); any other subclass runs the eager ops. Otherwise: the
    eager ops.
    """
    pool = None if type(bn) is nn.BatchNorm1d else getattr(bn, "statistics_pool", None)
    applies = (kernels is not None and words == "sfc64" and training and bn.training
               and (type(bn) is nn.BatchNorm1d or pool is not None)
               and x.device.type == "cpu" and x.dim() == 2 and bn.affine and bn.running_mean is not None
               and x.dtype == linear.weight.dtype == bn.weight.dtype == torch.float32)
    if not applies:
        return relu_dropout(bn(linear(x)), p, training, words=words)
    # nn.BatchNorm1d's bookkeeping (its forward does not run here)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    threshold, scale = dropout_threshold(p)
    drop_levels = threshold + _MASK_LEVELS // 2  # the kernel reads lanes unsigned: keep iff lane >= it
    h = torch.mm(x, linear.weight.t())  # (B, out), without the bias
    shift = linear.bias if linear.bias is not None else h.new_zeros(h.shape[1])
    # the generator dropout_keep_mask would use, so the kernel keeps exactly the entries the eager
    # ops keep; no draw without dropout (the eager ops draw none either)
    state = (keep_mask_generator().state["state"]["state"] if drop_levels > 0 else [0, 0, 0, 0])
    sfc64_state = torch.from_numpy(np.asarray(state, dtype=np.uint64).view(np.int64))  # (4,): a, b, c, counter
    if pool is not None:
        return kernels.pooled_batch_norm_relu_dropout(  # type: ignore[union-attr]
            h, shift, bn.weight, bn.bias, bn.running_mean, bn.running_var, pool, float(momentum), float(bn.eps),
            drop_levels, scale, sfc64_state)
    return kernels.batch_norm_relu_dropout(  # type: ignore[union-attr]
        h, shift, bn.weight, bn.bias, bn.running_mean, bn.running_var, float(momentum), float(bn.eps),
        drop_levels, scale, sfc64_state)


# A leaf for torch.fx as well: the Linear and BatchNorm modules become get_attr arguments, and the
# choice between kernel and eager ops is made at run time.
torch.fx.wrap("linear_batch_norm_relu_dropout")


def folded_linear_relu(x: torch.Tensor, linear: nn.Linear, bn: Optional[nn.BatchNorm1d],
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inference form of relu(bn(linear(x))) with BatchNorm's running statistics folded into the
    Linear: x (B, in) -> (B, out), in ``dtype`` if given (then x must already be in it).

    W' = diag(s) W and b' = s (b - mu) + beta with s = gamma / sqrt(var + eps), so one addmm and
    an in-place ReLU replace the matmul, the bias add, BatchNorm's pass over (B, out) and ReLU's.
    Folding costs O(in * out) per call, nothing against the (B, in, out) matmul at serving and
    evaluation batches, and keeps no state that could go stale when the weights change. Equal to
    the eager ops up to float rounding (tests/unit/test_inference_path.py says how close).
    """
    weight, bias = linear.weight, linear.bias
    if bn is not None:
        scale = torch.rsqrt(bn.running_var + bn.eps)  # (out,)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean if bias is None else bias - bn.running_mean
        weight = weight * scale.unsqueeze(1)  # (out, in)
        bias = shift * scale if bn.bias is None else torch.addcmul(bn.bias, shift, scale)  # (out,)
    if dtype is not None:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        # oneDNN's Linear with the ReLU fused into its output stage (the op torch's own compiler
        # emits for Linear -> ReLU on CPU): one pass over (B, out) where addmm first copies the
        # bias into every output row, then MKL accumulates onto it, then ReLU reads it again.
        # It has no backward: used under no_grad only (evaluation, predict and serve all are).
        # Not under torch.export / torch.compile, where the portable ops below are traced instead.
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
    out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())  # (B, out)
    return out.relu_()


# A leaf for torch.fx, like the training block.
torch.fx.wrap("folded_linear_relu")


def _onednn_linear_dtypes() -> frozenset:
    """The dtypes oneDNN's fused Linear runs on this CPU: float32 wherever it is built in, and
    bfloat16 only with bf16 instructions (AVX512-BF16, AMX); on an AVX2-only CPU it refuses to build
    a bf16 primitive, and bf16 takes the portable addmm (correct, without the speed-up)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return frozenset()
    bf16_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    bf16 = bool(bf16_check()) if bf16_check is not None else False
    return frozenset({torch.float32, torch.bfloat16} if bf16 else {torch.float32})


_ONEDNN_DTYPES = _onednn_linear_dtypes()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN with AVX512-BF16 or AMX). Without,
    bf16 (dense_precision, inference_precision) still computes the same function, but on torch's
    portable path, several times slower than fp32: the builders say so."""
    return torch.bfloat16 in _ONEDNN_DTYPES


class MLPEncoder(nn.Module):
    """Hidden layers Linear -> BatchNorm1d -> ReLU -> Dropout, no output layer.

    forward: x (B, in_dim) -> (B, out_dim), out_dim = hidden_units[-1] (in_dim if no layer).

    fused=False: `self.net(x)`, the plain nn.Sequential (what the reference runs).
    fused=True: the same modules and parameters (same state_dict), each block run as
    `linear_batch_norm_relu_dropout` (on CPU in float32 training a matmul and one compiled kernel;
    otherwise Linear, BatchNorm, then `relu_dropout`: one fused ReLU + dropout op with a cheaper
    mask on CPU).
    compute_dtype (fused only): e.g. torch.bfloat16 runs the Linear layers, BatchNorm (fp32
    statistics and affine parameters) and ReLU/dropout in that dtype; parameters and their
    gradients stay fp32 and the output is cast back to the input dtype.
    bn_relu_dropout (fused only): the loaded CPU kernels (`tf4ctr_dist.kernels.load`) to run
    BatchNorm -> ReLU -> dropout as one kernel on CPU in float32 training, or None (eager ops).
    keep_mask_words (fused only): "sfc64" (default) or "torch", see `dropout_keep_mask`; the
    kernel runs only with "sfc64" (it draws the same words itself).
    inference (fused only, in eval mode): "fused" runs each block as `folded_linear_relu`
    (BatchNorm folded into the Linear, one addmm and an in-place ReLU); "eager" runs the
    training-mode ops with dropout off.
    inference_dtype (fused only, "fused"): the dtype of the folded blocks' matmuls, e.g.
    torch.bfloat16 (input cast once, output cast back); None: compute_dtype, else the input's.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        batch_norm: bool = True,
        fused: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        bn_relu_dropout: Optional["CpuKernels"] = None,
        keep_mask_words: str = "sfc64",
        inference: str = "fused",
        inference_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if compute_dtype is not None and not fused:
            raise ValueError("compute_dtype needs fused=True")
        if inference not in INFERENCE_PATHS:
            raise ValueError(f"inference={inference!r}: expected one of {INFERENCE_PATHS}")
        if keep_mask_words not in MASK_WORDS:
            raise ValueError(f"keep_mask_words={keep_mask_words!r}: expected one of {MASK_WORDS}")
        layers: list[nn.Module] = []
        blocks: list[tuple[int, int]] = []  # (index of the Linear, index of its BatchNorm or -1)
        prev = in_dim
        for units in hidden_units:
            blocks.append((len(layers), len(layers) + 1 if batch_norm else -1))
            layers.append(init_linear(nn.Linear(prev, units)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = units
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = prev
        self.dropout = float(dropout)
        self.fused = fused
        self.compute_dtype = compute_dtype
        self.bn_relu_dropout = bn_relu_dropout if fused else None
        self.keep_mask_words = keep_mask_words
        self.inference = inference
        self.inference_dtype = inference_dtype
        self._blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.net(x)
        out_dtype = x.dtype
        if not self.training and self.inference == "fused":
            dt = self.inference_dtype or self.compute_dtype
            if dt is not None:
                x = x.to(dt)
            for li, bi in self._blocks:
                x = folded_linear_relu(x, self.net[li], self.net[bi] if bi >= 0 else None, dt)
            return x.to(out_dtype)
        dt = self.compute_dtype
        if dt is not None:
            x = x.to(dt)
        for li, bi in self._blocks:
            lin = self.net[li]
            if dt is None and bi >= 0:
                x = linear_batch_norm_relu_dropout(x, lin, self.net[bi], self.dropout, self.training,
                                                   self.bn_relu_dropout, self.keep_mask_words)
                continue
            if dt is None:
                x = lin(x)
            else:
                x = F.linear(x, lin.weight.to(dt), lin.bias.to(dt) if lin.bias is not None else None)
            if bi >= 0:
                x = self.net[bi](x)
            x = relu_dropout(x, self.dropout, self.training, words=self.keep_mask_words)
        return x.to(out_dtype) if dt is not None else x
