"""backward_concurrently: same gradients as plain autograd, the second graph on another thread,
errors surface, fx leaf; and a TF4CTR model with the switch on trains like one without."""

from __future__ import annotations

import threading

import pytest
import torch
import torchrec
from torch import nn

from tests.unit.test_tf4ctr_model import SMALL_FIELDS, build, small_batch
from tf4ctr_dist.modules.concurrent import backward_concurrently


class _RecordThread(torch.autograd.Function):
    """Identity that records which thread ran its backward."""

    seen: list[str] = []

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        _RecordThread.seen.append(threading.current_thread().name)
        return g


def _graphs(concurrent: bool):
    torch.manual_seed(0)
    x1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    lin1, lin2 = nn.Linear(4, 6).double(), nn.Linear(3, 6).double()
    a = torch.tanh(lin1(_RecordThread.apply(x1)))  # (5, 6)
    b = lin2(_RecordThread.apply(x2)) ** 2  # (5, 6)
    if concurrent:
        a, b = backward_concurrently(a, b)
    loss = (a * b).sum() + a.pow(3).mean()  # both outputs feed the loss, a twice
    loss.backward()
    return [x1.grad, x2.grad] + [p.grad for p in (*lin1.parameters(), *lin2.parameters())]


def test_gradients_equal_plain_autograd_and_second_graph_runs_on_another_thread():
    _RecordThread.seen = []
    want = _graphs(False)
    assert _RecordThread.seen == ["MainThread", "MainThread"]
    _RecordThread.seen = []
    got = _graphs(True)
    assert sorted(_RecordThread.seen) == ["MainThread", "tf4ctr-backward-1"]
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=0, atol=0)


class _Fails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        raise ValueError("table update failed")


def test_an_error_in_either_thread_reaches_the_caller():
    for failing in (0, 1):
        xs = [torch.randn(3, requires_grad=True) for _ in range(2)]
        ys = [_Fails.apply(x) if i == failing else x * 2 for i, x in enumerate(xs)]
        a, b = backward_concurrently(*ys)
        with pytest.raises(ValueError, match="table update failed"):
            (a + b).sum().backward()


def test_identity_without_grad():
    x, y = torch.randn(2), torch.randn(2)
    assert backward_concurrently(x, y) == (x, y)
    with torch.no_grad():
        a = torch.randn(2, requires_grad=True)
        assert backward_concurrently(a, a * 2)[0] is a


def test_tf4ctr_with_concurrent_backward_traces_and_trains_the_same():
    def run(concurrent: bool):
        torch.manual_seed(3)
        model = build(SMALL_FIELDS, 8, "ser", "wsf", easy=[16], hard=[16, 8], dropout=0.0)
        model.concurrent_table_backward = concurrent
        z, z_s, z_c = model(small_batch())
        (z.sum() + z_s.pow(2).sum() - z_c.mean()).backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters()}

    model, got = run(True)
    _, want = run(False)
    assert got.keys() == want.keys()
    for name in want:  # every table of both sets and every dense weight
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert any("hard_embedding" in n and got[n].abs().sum() > 0 for n in got)
    traced = torchrec.fx.symbolic_trace(model)
    assert any(n.op == "call_function" and n.target is backward_concurrently for n in traced.graph.nodes)
