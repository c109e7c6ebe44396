"""The compiled BatchNorm -> ReLU -> dropout CPU kernel behind `linear_batch_norm_relu_dropout`
(tf4ctr_dist/kernels, csrc/): the same values and gradients as a float64 eager Linear ->
BatchNorm -> ReLU -> dropout, the same dropout masks as the eager ops, BatchNorm's
running-statistics bookkeeping, the eager ops where no kernels are passed in, and the kernel in
halves (statistics pooled over workers) giving the fused kernel's bits with one worker."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tf4ctr_dist.kernels import BatchNormReLUDropout, PooledBatchNormReLUDropout, load
from tf4ctr_dist.modules import MLPEncoder
from tf4ctr_dist.modules.mlp import dropout_threshold, linear_batch_norm_relu_dropout

KERNELS = load("on")  # a failed build must fail these tests (KernelUnavailable says why)


class Block(nn.Module):
    """Linear -> BatchNorm1d with parameters away from the identity, run by the function under test
    with the kernels (``kernels``, default: loaded) or the eager ops (None)."""

    def __init__(self, n_in: int, n: int, momentum: float | None = 0.1, seed: int = 0, kernels=KERNELS) -> None:
        super().__init__()
        self.kernels = kernels
        torch.manual_seed(seed)
        self.linear = nn.Linear(n_in, n)
        self.bn = nn.BatchNorm1d(n, momentum=momentum)
        with torch.no_grad():
            self.linear.bias.uniform_(-2, 2)  # moves the running mean
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return linear_batch_norm_relu_dropout(x, self.linear, self.bn, p, self.training, self.kernels)


def _reference(x: torch.Tensor, block: Block, keep: torch.Tensor, scale: float):
    """float64 eager Linear -> BatchNorm (train) -> ReLU -> mask * scale on a copy of block."""
    ref = nn.Sequential(nn.Linear(block.linear.in_features, block.linear.out_features),
                        nn.BatchNorm1d(block.bn.num_features, momentum=block.bn.momentum)).double()
    ref.load_state_dict({k.replace("linear", "0").replace("bn", "1"): v.double() if v.is_floating_point() else v
                         for k, v in block.state_dict().items()})
    xr = x.detach().double().requires_grad_()
    y = F.relu(ref(xr)) * keep.double() * scale
    return xr, y, ref


def _assert_grads_match(block: Block, ref: nn.Sequential) -> None:
    lin, bn = ref[0], ref[1]
    torch.testing.assert_close(block.linear.weight.grad, lin.weight.grad.float(), rtol=1e-4, atol=1e-4)
    # zero in exact arithmetic (BatchNorm cancels the bias); the kernel returns exact zeros
    assert torch.equal(block.linear.bias.grad, torch.zeros_like(block.linear.bias))
    assert lin.bias.grad.abs().max().item() < 1e-9
    torch.testing.assert_close(block.bn.weight.grad, bn.weight.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.bn.bias.grad, bn.bias.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,cols", [(2, 1), (37, 5), (300, 33), (4096, 40)])
def test_no_dropout_equals_float64_linear_batch_norm_relu(rows, cols):
    """Values, all gradients and running statistics; batches below, at and above the 64-row
    threshold for splitting rows over threads."""
    block = Block(7, cols)
    x = (torch.randn(rows, 7) * 3 + 1).requires_grad_()
    xr, yr, ref = _reference(x, block, torch.ones(rows, cols, dtype=torch.bool), 1.0)
    y = block(x, 0.0)
    torch.testing.assert_close(y, yr.float(), rtol=1e-5, atol=1e-5)
    g = torch.randn(rows, cols)
    y.backward(g)
    yr.backward(g.double())
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=1e-4, atol=1e-5)
    _assert_grads_match(block, ref)
    torch.testing.assert_close(block.bn.running_mean, ref[1].running_mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.bn.running_var, ref[1].running_var.float(), rtol=1e-5, atol=1e-5)
    assert int(block.bn.num_batches_tracked) == int(ref[1].num_batches_tracked) == 1


def test_dropout_values_and_gradients_follow_the_kernels_mask():
    """Where the normalised value is positive, an entry is either dropped (0) or kept and scaled;
    the gradients are the float64 ones with exactly that keep mask."""
    block = Block(20, 64)
    x = torch.randn(512, 20, requires_grad=True)
    p = 0.3
    _, scale = dropout_threshold(p)
    y = block(x, p)
    keep = y.detach() > 0
    xr, yr, ref = _reference(x, Block(20, 64), keep, scale)  # a fresh copy: its own running stats
    assert torch.equal(yr.detach() > 0, keep)  # nothing kept where ReLU zeroes
    assert 0.25 < 1 - keep.float().mean().item() / 0.5 < 0.35  # about half is positive; 30% of it dropped
    torch.testing.assert_close(y, yr.float(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=1e-4, atol=1e-5)
    _assert_grads_match(block, ref)


@pytest.mark.parametrize("rows,cols", [(4096, 400), (37, 5)])  # 37 * 5: not a multiple of 4 lanes
def test_same_masks_values_and_gradients_as_the_eager_ops(rows, cols):
    """Same seed, same keep mask as relu_dropout (the kernel runs the same SFC64 words); values
    and gradients within float32 rounding of the eager Linear -> BatchNorm -> relu_dropout."""
    runs = {}
    for enabled in (True, False):
        block = Block(16, cols, kernels=KERNELS if enabled else None)
        x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
        torch.manual_seed(11)
        runs[enabled] = (block, x, block(x, 0.2), torch.randint(0, 1000, (3,)))
    (kb, kx, ky, k_next), (eb, ex, ey, e_next) = runs[True], runs[False]
    assert torch.equal(k_next, e_next)  # the kernel path leaves torch's generator where the eager ops do
    differ = (ky > 0) != (ey > 0)
    # only where the normalised value rounds to either side of 0 (1 in 1.6M entries here)
    assert differ.sum().item() <= 5
    assert (ky[differ].abs() < 1e-5).all() and (ey[differ].abs() < 1e-5).all()
    torch.testing.assert_close(ky, ey, rtol=1e-4, atol=1e-4)
    g = (~differ).float()  # such an entry's gradient would differ by design: leave it out
    ky.backward(g)
    ey.backward(g)
    torch.testing.assert_close(kx.grad, ex.grad, rtol=1e-4, atol=1e-4)
    for name in ("linear.weight", "bn.weight", "bn.bias"):  # sums over the batch: tolerance by their scale
        a, b = kb.get_parameter(name).grad, eb.get_parameter(name).grad
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)
    torch.testing.assert_close(kb.bn.running_var, eb.bn.running_var, rtol=1e-5, atol=1e-5)


def test_dropout_rate_seeding_and_thread_independence():
    block = Block(16, 100)
    x = torch.randn(4096, 16)
    with torch.no_grad():  # every normalised value positive: only dropout zeroes entries
        block.bn.bias.fill_(10.0)
    torch.manual_seed(3)
    y1 = block(x, 0.2)
    dropped = (y1 == 0).float()
    assert dropped.mean().item() == pytest.approx(0.2, abs=0.003)  # n = 409,600: sd of the rate ~0.0006
    assert dropped.mean(0).std().item() < 0.03 and dropped.mean(1).std().item() < 0.05  # no column/row pattern
    y2 = block(x, 0.2)
    agree = ((y1 == 0) == (y2 == 0)).float().mean().item()
    assert agree == pytest.approx(0.2**2 + 0.8**2, abs=0.01)  # independent masks from call to call
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            assert torch.equal(block(x, 0.2) == 0, y1 == 0)  # torch's seed drives it, not the threads
    finally:
        torch.set_num_threads(threads)
    assert (block(x, 0.5) == 0).float().mean().item() == pytest.approx(0.5, abs=0.005)


def test_cumulative_average_when_momentum_is_none():
    block, ref = Block(4, 8, momentum=None), Block(4, 8, momentum=None)
    for step in range(3):
        x = torch.randn(50, 4) + step
        block(x, 0.0)
        ref.bn(ref.linear(x))
    assert int(block.bn.num_batches_tracked) == 3
    torch.testing.assert_close(block.bn.running_mean, ref.bn.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.bn.running_var, ref.bn.running_var, rtol=1e-5, atol=1e-5)


def test_one_row_is_an_error_like_batch_norms():
    with pytest.raises(RuntimeError, match="more than 1 row"):
        Block(3, 4)(torch.randn(1, 3), 0.1)


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = BatchNormReLUDropout.apply

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(BatchNormReLUDropout, "apply", counting)
    return calls


def test_eager_ops_outside_float32_cpu_training(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    block = Block(3, 6)
    x = torch.randn(20, 3)
    block(x, 0.2)
    assert len(calls) == 1
    block.eval()
    torch.testing.assert_close(block(x, 0.2), F.relu(block.bn(block.linear(x))))
    block.train()
    block.double()(x.double(), 0.2)
    block.float()
    block.kernels = None  # no kernels passed in
    block(x, 0.2)
    block.kernels = KERNELS
    MLPEncoder(3, [6], 0.2, fused=True, bn_relu_dropout=KERNELS, keep_mask_words="torch")(x)  # the kernel draws sfc64
    assert len(calls) == 1
    MLPEncoder(3, [6], 0.2, fused=True, bn_relu_dropout=KERNELS)(x)
    assert len(calls) == 2


def test_fused_encoder_trains_with_the_kernel_like_the_eager_ops(monkeypatch):
    """A few SGD steps of a fused MLPEncoder without dropout: kernel on and off agree."""
    calls = _count_kernel_calls(monkeypatch)
    results = []
    for enabled in (True, False):
        torch.manual_seed(0)
        enc = MLPEncoder(12, [32, 16], 0.0, fused=True, bn_relu_dropout=KERNELS if enabled else None)
        opt = torch.optim.SGD(enc.parameters(), lr=0.1)
        torch.manual_seed(1)
        for _ in range(5):
            loss = enc(torch.randn(128, 12)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append(enc.state_dict())
    assert len(calls) == 2 * 5  # two layers, five steps, only with the kernels passed in
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_encoder_with_the_kernels_traces_and_the_traced_module_runs_them(monkeypatch):
    """torch.fx (TorchRec's pipeline traces the model) carries the kernels' handle into the leaf
    call; the traced module runs the kernel in training like the encoder itself."""
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    enc = MLPEncoder(12, [16], 0.2, fused=True, bn_relu_dropout=KERNELS)
    gm = torch.fx.symbolic_trace(enc)
    leaf = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is linear_batch_norm_relu_dropout]
    assert len(leaf) == 1
    x = torch.randn(64, 12)
    torch.manual_seed(4)
    y_traced = gm(x)
    torch.manual_seed(4)
    y = enc(x)
    assert len(calls) == 2
    torch.testing.assert_close(y_traced, y)


def test_values_statistics_and_gradients_are_bitwise_the_same_at_any_thread_count():
    """The kernel's column sums, forward (batch statistics) and backward (BatchNorm's weight and
    bias gradients, which every input gradient uses), run over fixed chunks of rows added in order,
    so the thread count changes no bit. (The kernel alone: torch's matmul around it is MKL's.)"""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(5000, 40, generator=gen) * 3 + 1
    g = torch.randn(5000, 40, generator=gen)
    shift, weight, bias = (torch.randn(40, generator=gen) for _ in range(3))
    drop_levels = dropout_threshold(0.3)[0] + 2**15
    state = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            hi, wi, bi = (t.clone().requires_grad_() for t in (h, weight, bias))
            running_mean, running_var = torch.zeros(40), torch.ones(40)
            y = KERNELS.batch_norm_relu_dropout(hi, shift, wi, bi, running_mean, running_var, 0.1, 1e-5,
                                                drop_levels, 1 / 0.7, state)
            (y * g).sum().backward()
            results.append([y.detach(), hi.grad, wi.grad, bi.grad, running_mean, running_var])
    finally:
        torch.set_num_threads(threads)
    assert results[0][0].count_nonzero() > 0 and results[0][2].abs().sum() > 0
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


class _OneWorker:
    """A StatisticsPool of this process alone; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pool_moments(self, count, moments):
        self.calls.append("moments")
        return count, moments

    def pool_sums(self, sums):
        self.calls.append("sums")
        return sums


@pytest.mark.parametrize("rows,cols,p", [(4096, 400, 0.2), (37, 5, 0.0), (375, 33, 0.5)])
def test_pooled_halves_of_one_worker_are_the_fused_kernel_bit_for_bit(rows, cols, p):
    """What `train.sync_batch_norm` runs on CPU workers (tests/distributed/test_cross_worker_batch_norm.py
    pools over two gloo ranks): the same passes, so with nothing to pool the same bits."""
    gen = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, cols, generator=gen) * 3 + 1
    g = torch.randn(rows, cols, generator=gen)
    shift, weight, bias = (torch.randn(cols, generator=gen) for _ in range(3))
    threshold, scale = dropout_threshold(p)
    state = torch.tensor([7, 8, 9, 10], dtype=torch.int64)
    pool = _OneWorker()
    results = []
    for pooled in (False, True):
        hi, si, wi, bi = (t.clone().requires_grad_() for t in (h, shift, weight, bias))
        running_mean, running_var = torch.zeros(cols), torch.ones(cols)
        args = (hi, si, wi, bi, running_mean, running_var)
        rest = (0.1, 1e-5, threshold + 2**15, scale, state)
        y = (PooledBatchNormReLUDropout.apply(*args, KERNELS, pool, *rest) if pooled
             else BatchNormReLUDropout.apply(*args, KERNELS, *rest))
        (y * g).sum().backward()
        results.append([y.detach(), hi.grad, si.grad, wi.grad, bi.grad, running_mean, running_var])
    assert pool.calls == ["moments", "sums"]
    assert results[0][0].count_nonzero() > 0 and results[0][1].abs().sum() > 0
    for name, a, b in zip(("y", "grad x", "grad shift", "grad weight", "grad bias", "running mean", "running var"),
                          *results):
        assert torch.equal(a, b), name
