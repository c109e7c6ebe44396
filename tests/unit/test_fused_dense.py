"""The fused dense fast path (MLPEncoder(fused=True), relu_dropout, 16-bit dropout masks) and
the bf16 dense option (ModelConfig.dense_precision): same math as the plain path, traceable,
and bf16 trains close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchrec
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tf4ctr_dist.config import LossConfig, ModelConfig
from tf4ctr_dist.data.batch import Batch
from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr
from tf4ctr_dist.modules import MLPEncoder
from tf4ctr_dist.modules import mlp as mlp_mod
from tf4ctr_dist.modules.mlp import (
    dropout_keep_mask,
    dropout_threshold,
    folded_linear_relu,
    linear_batch_norm_relu_dropout,
    relu_dropout,
)


def test_threshold_rounds_p_to_16_bits_and_keeps_the_expectation():
    thr, scale = dropout_threshold(0.2)
    assert thr == -32768 + 13107
    assert scale == pytest.approx(1 / (1 - 13107 / 65536), rel=1e-15)
    assert dropout_threshold(0.5) == (0, 2.0)
    assert dropout_threshold(0.0) == (-32768, 1.0)
    with pytest.raises(ValueError):
        dropout_threshold(1.0)


def test_keep_mask_rate_shape_and_seed():
    torch.manual_seed(1)
    m = dropout_keep_mask((1001, 37), 0.2)  # odd size: not a multiple of the 4 lanes per draw
    assert m.dtype == torch.bool and m.shape == (1001, 37)
    rate = 1 - m.float().mean().item()
    assert rate == pytest.approx(0.2, abs=0.005)  # n = 37,037: sd of the rate ~0.002
    # rows and columns are not correlated with the lane position
    assert (1 - m.float().mean(0)).std().item() < 0.03
    torch.manual_seed(1)
    assert torch.equal(dropout_keep_mask((1001, 37), 0.2), m)  # torch.manual_seed drives it
    assert 1 - dropout_keep_mask((200_000,), 0.5).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_dropout_equals_relu_then_masked_dropout(dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 33, dtype=dtype)
    x[0, :5] = 0.0  # relu's subgradient at 0
    keep = torch.rand(64, 33) > 0.3
    _, scale = dropout_threshold(0.3)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya = relu_dropout(a, 0.3, True, keep=keep)
    yb = F.relu(b) * keep.to(dtype) * scale  # what F.dropout does with this mask
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # eval mode and p = 0: plain ReLU
    assert torch.equal(relu_dropout(x, 0.3, False), F.relu(x))
    assert torch.equal(relu_dropout(x, 0.0, True), F.relu(x))


def test_relu_dropout_random_mask_rate():
    torch.manual_seed(0)
    x = torch.rand(4096, 100) + 0.1  # all positive: only dropout zeroes entries
    y = relu_dropout(x, 0.2, True)
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.005)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * dropout_threshold(0.2)[1])


def _encoders(dropout: float):
    torch.manual_seed(0)
    plain = MLPEncoder(24, [16, 12], dropout)
    fused = MLPEncoder(24, [16, 12], dropout, fused=True)
    fused.load_state_dict(plain.state_dict())  # same layout, same keys
    assert list(plain.state_dict()) == list(fused.state_dict())
    assert [type(m) for m in fused.net] == [type(m) for m in plain.net]
    return plain, fused


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_same_gradients(plain, fused, xa, xb, ya, yb) -> None:
    """Back-propagate one random gradient through both outputs; input and parameter gradients match."""
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (n, ga), gb in zip(_grads(plain).items(), _grads(fused).values()):
        # atol 1e-5: a Linear bias feeding BatchNorm has a zero gradient in exact arithmetic, so
        # both sides hold rounding noise of gradients ~10 in size there
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("train", [True, False])
def test_fused_encoder_equals_plain_without_dropout(train):
    """BatchNorm in train mode (batch statistics, running stats updated) or eval mode."""
    plain, fused = _encoders(0.0)
    plain.train(train)
    fused.train(train)
    x = torch.randn(32, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), fused(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    _assert_same_gradients(plain, fused, xa, xb, ya, yb)
    for (n, sa), sb in zip(plain.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(sb, sa, msg=n)  # BatchNorm running stats too


def test_fused_encoder_with_dropout_equals_the_plain_layers_with_the_same_masks(monkeypatch):
    """The eager fused path (no kernels passed in; test_cpu_kernels covers the kernel's masks)."""
    plain, fused = _encoders(0.25)
    masks: list[torch.Tensor] = []
    real = mlp_mod.dropout_keep_mask

    def recording(shape, p, device="cpu", words="sfc64"):
        masks.append(real(shape, p, device, words))
        return masks[-1]

    monkeypatch.setattr(mlp_mod, "dropout_keep_mask", recording)
    x = torch.randn(32, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    yb = fused.train()(xb)
    assert len(masks) == 2
    # the plain modules, with nn.Dropout replaced by the recorded masks
    _, scale = dropout_threshold(0.25)
    h = xa
    for i, mask in zip((0, 4), masks):
        h = F.relu(plain.net[i + 1](plain.net[i](h))) * mask * scale
    ya = h
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    _assert_same_gradients(plain, fused, xa, xb, ya, yb)


def test_fused_encoder_fx_traces_as_a_leaf_call():
    _, fused = _encoders(0.2)
    x = torch.randn(8, 24)
    gm = torch.fx.symbolic_trace(fused.train())  # what TorchRec's pipeline traces
    assert any(n.op == "call_function" and n.target is linear_batch_norm_relu_dropout for n in gm.graph.nodes)
    torch.manual_seed(3)
    traced = gm(x)
    torch.manual_seed(3)
    torch.testing.assert_close(traced, fused(x))
    gm = torch.fx.symbolic_trace(fused.eval())
    assert any(n.op == "call_function" and n.target is folded_linear_relu for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), fused(x))


def test_compute_dtype_needs_fused():
    with pytest.raises(ValueError):
        MLPEncoder(8, [4], 0.1, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        tf4ctr([("a", 5)], ModelConfig(dense_precision="bf16"), fused_dense=False)


# ---- bf16 dense option on the assembled model ---------------------------------------------------

FIELDS = [(f"f{i}", 50) for i in range(6)]


def _model(precision: str) -> TF4CTRTrain:
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, easy_hidden_units=[64, 64], hard_hidden_units=[64, 64, 64],
                      net_dropout=0.1, dense_precision=precision)
    model = TF4CTRTrain(tf4ctr(FIELDS, cfg, device="cpu"), Objective(LossConfig(loss="tf")))
    with torch.no_grad():  # tables away from their tiny init so the inputs matter
        for name, p in model.named_parameters():
            if "embedding_bags" in name:
                p.copy_(0.3 * torch.randn(p.shape))
    return model


def _data(n: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, len(FIELDS)), generator=g)
    # a learnable rule: click when the first two fields' ids are both small
    labels = ((ids[:, 0] < 20) & (ids[:, 1] < 30)).float()
    return ids, labels


def _batch(ids: torch.Tensor, labels: torch.Tensor) -> Batch:
    n = len(ids)
    kjt = KeyedJaggedTensor(keys=[f for f, _ in FIELDS], values=ids.t().reshape(-1),
                            lengths=torch.ones(n * len(FIELDS), dtype=torch.int32))
    return Batch(kjt, labels, torch.zeros(n, dtype=torch.int64), torch.arange(n), torch.ones(n))


def test_bf16_model_is_fp32_outside_the_towers_and_traceable():
    m = _model("bf16")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.model.simple_encoder.compute_dtype == torch.bfloat16
    ids, labels = _data(64)
    b = _batch(ids, labels)
    loss, (_, probs, _, _) = m(b)
    assert loss.dtype == torch.float32 and probs.dtype == torch.float32
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in m.parameters())
    m.eval()
    gm = torchrec.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(b)[0], m(b)[0])


def test_bf16_forward_close_to_fp32_with_the_same_weights():
    fp32, bf16 = _model("fp32").eval(), _model("bf16").eval()
    bf16.load_state_dict(fp32.state_dict())
    b = _batch(*_data(512))
    with torch.no_grad():
        _, (_, p32, _, _) = fp32(b)
        _, (_, p16, _, _) = bf16(b)
    assert (p16 - p32).abs().max().item() < 0.02
    assert (p16 - p32).abs().mean().item() < 0.005


def _train(model: TF4CTRTrain, steps: int = 60) -> list[float]:
    ids, labels = _data(4096)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for s in range(steps):
        i = (s * 256) % len(ids)
        loss, _ = model(_batch(ids[i : i + 256], labels[i : i + 256]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_trains_and_stays_close_to_fp32():
    l32 = _train(_model("fp32"))
    l16 = _train(_model("bf16"))
    first = sum(l16[:5]) / 5
    last16, last32 = sum(l16[-10:]) / 10, sum(l32[-10:]) / 10
    assert last16 < 0.7 * first  # it learns
    assert last16 == pytest.approx(last32, rel=0.15, abs=0.02)  # and like fp32 does
    # same data, same init: held-out predictions agree closely
    ids, labels = _data(1024, seed=1)
    m32, m16 = _model("fp32"), _model("bf16")
    _train(m32), _train(m16)
    with torch.no_grad():
        p32 = m32.eval()(_batch(ids, labels))[1][1]
        p16 = m16.eval()(_batch(ids, labels))[1][1]
    acc = lambda p: ((p > 0.5).float() == labels).float().mean().item()  # noqa: E731
    assert acc(p16) > 0.9 and abs(acc(p16) - acc(p32)) < 0.03


def test_reference_keeps_the_plain_encoders():
    from benchmarks.reference import ReferenceTF4CTR

    ref = ReferenceTF4CTR([5] * 4, ModelConfig(embedding_dim=4, easy_hidden_units=[8], hard_hidden_units=[8]))
    assert not ref.simple_encoder.fused and not ref.complex_encoder.fused
    model = tf4ctr([(f"f{i}", 5) for i in range(4)], ModelConfig(embedding_dim=4))
    assert model.simple_encoder.fused and model.complex_encoder.fused
    copy.deepcopy(model)  # the fused encoders hold no unpicklable state


def test_pooled_embeddings_in_table_order_are_used_without_a_copy():
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from tf4ctr_dist.modules.tf4ctr import _in_order

    values = torch.randn(3, 2 + 3)
    kt = KeyedTensor(keys=["a", "b"], length_per_key=[2, 3], values=values)
    assert _in_order(kt, ["a", "b"]) is values
    torch.testing.assert_close(_in_order(kt, ["a", "b"], reuse=False), values)
    swapped = _in_order(kt, ["b", "a"])
    torch.testing.assert_close(swapped, torch.cat([values[:, 2:], values[:, :2]], dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_positive_by_bits_equals_float_compare(dtype):
    from tf4ctr_dist.modules.mlp import _positive

    x = torch.randn(1000).to(dtype)
    x[:6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf")]).to(dtype)
    assert torch.equal(_positive(x), x > 0)
    assert torch.equal(_positive(x.view(10, 100).t()), x.view(10, 100).t() > 0)  # non-contiguous


def test_relu_dropout_bf16_equals_the_float_formula():
    torch.manual_seed(0)
    x = torch.randn(256, 40).to(torch.bfloat16)
    keep = torch.rand(256, 40) > 0.2
    _, scale = dropout_threshold(0.2)
    a = x.clone().requires_grad_()
    y = relu_dropout(a, 0.2, True, keep=keep)
    kf = ((x > 0) & keep).to(torch.bfloat16) * torch.tensor(scale).to(torch.bfloat16)  # scale in bf16
    torch.testing.assert_close(y, F.relu(x) * kf, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), F.relu(x.float()) * keep * scale, rtol=2**-8, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(a.grad, kf, rtol=0, atol=0)
