"""The inference forward of the MLP towers (ModelConfig.inference / inference_precision):
BatchNorm folded into the Linear, Linear + ReLU as one op, optionally in bf16. Same function as
the eager eval-mode ops up to float rounding; bf16 within its own tolerance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tf4ctr_dist.config import ModelConfig
from tf4ctr_dist.model import tf4ctr
from tf4ctr_dist.modules import MLPEncoder
from tf4ctr_dist.modules.mlp import folded_linear_relu
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def _block(seed: int, n_in: int = 24, n_out: int = 16, bias: bool = True, affine: bool = True):
    """A Linear + BatchNorm1d in eval mode whose running statistics and affine terms are far
    from their defaults, so that a fold that drops or misplaces any of them changes the output."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    bn = nn.BatchNorm1d(n_out, affine=affine, eps=1e-3)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(n_out, generator=g))
        bn.running_mean.copy_(torch.randn(n_out, generator=g) * 3)
        bn.running_var.copy_(torch.rand(n_out, generator=g) * 4 + 0.01)
        if affine:
            bn.weight.copy_(torch.randn(n_out, generator=g))
            bn.bias.copy_(torch.randn(n_out, generator=g))
    return linear.eval(), bn.eval()


@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("grad", [False, True])  # False: the oneDNN op on CPU; True: addmm + relu_
def test_folded_block_equals_linear_batchnorm_relu(bias, affine, grad):
    linear, bn = _block(1, bias=bias, affine=affine)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.relu(bn(linear(x))).double()
    with torch.set_grad_enabled(grad):
        got = folded_linear_relu(x, linear, bn)
    assert got.shape == (64, 16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert (got == 0).any() and (got > 0).any()  # the ReLU is active on both sides
    # without BatchNorm it is Linear + ReLU
    with torch.set_grad_enabled(grad):
        plain = folded_linear_relu(x, linear, None)
    with torch.no_grad():
        torch.testing.assert_close(plain, torch.relu(linear(x)), rtol=1e-5, atol=1e-5)


def test_fold_is_not_a_plain_linear():
    """The test above can fail: a fold without the running statistics is far off."""
    linear, bn = _block(3)
    x = torch.randn(32, 24)
    with torch.no_grad():
        right = torch.relu(bn(linear(x)))
        wrong = torch.relu(linear(x) * bn.weight + bn.bias)
    assert (right - wrong).abs().max() > 1e-2


def _encoders(dropout: float = 0.3):
    torch.manual_seed(0)
    fused = MLPEncoder(24, [32, 32, 16], dropout, fused=True)
    eager = MLPEncoder(24, [32, 32, 16], dropout, fused=True, inference="eager")
    eager.load_state_dict(fused.state_dict())
    # a few training batches so the running statistics are not the initial 0 / 1
    for m in (fused, eager):
        m.train()
        torch.manual_seed(5)
        for _ in range(3):
            m(torch.randn(128, 24) * 2 + 1)
        m.eval()
    return fused, eager


def test_encoder_inference_matches_eager_eval_and_has_gradients():
    fused, eager = _encoders()
    x = torch.randn(200, 24)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-6)
    # with gradients on (the addmm path) it is the same function and backpropagates
    out = fused(x)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in fused.named_parameters()
               if n.endswith("weight") and p.dim() == 2)


def test_encoder_bf16_inference_is_close_but_not_fp32():
    fused, eager = _encoders()
    bf16 = MLPEncoder(24, [32, 32, 16], 0.3, fused=True, inference_dtype=torch.bfloat16)
    bf16.load_state_dict(fused.state_dict())
    bf16.eval()
    x = torch.randn(200, 24)
    with torch.no_grad():
        ref, low = eager(x), bf16(x)
    assert low.dtype == torch.float32  # cast back for the heads
    scale = ref.abs().max()
    assert (low - ref).abs().max() < 3e-2 * scale  # bf16 has 8 significant bits
    assert (low - ref).abs().max() > 1e-5 * scale  # and it really ran in bf16
    # training is unaffected by the inference settings
    bf16.train()
    fused.train()
    torch.manual_seed(9)
    a = bf16(x)
    torch.manual_seed(9)
    b = fused(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("onednn", [True, False])
def test_bf16_fold_runs_on_every_cpu(onednn, monkeypatch):
    """oneDNN builds no bf16 Linear on CPUs without bf16 instructions (AVX2-only): the fold then
    takes the portable addmm. Both routes give the bf16 function, on whatever CPU runs the test
    (onednn=True only where this CPU has bf16 instructions; False forces the portable route)."""
    from tf4ctr_dist.modules import mlp

    if not onednn:
        monkeypatch.setattr(mlp, "_ONEDNN_DTYPES", frozenset({torch.float32}))
    bf16_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    has_bf16 = torch.backends.mkldnn.is_available() and bf16_check is not None and bool(bf16_check())
    assert (torch.bfloat16 in mlp._ONEDNN_DTYPES) == (onednn and has_bf16)
    linear, bn = _block(4)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = torch.relu(bn(linear(x)))
        got = folded_linear_relu(x.to(torch.bfloat16), linear, bn, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() < 3e-2 * scale
    assert (got.float() - expected).abs().max() > 1e-5 * scale


FIELDS = [(f"f{i}", 40) for i in range(5)]


def _probabilities(cfg: ModelConfig, features, state=None):
    torch.manual_seed(0)
    model = tf4ctr(FIELDS, cfg, device="cpu")
    if state is not None:
        model.load_state_dict(state)
    else:
        with torch.no_grad():  # tables away from their tiny init, BN statistics off their defaults
            for name, p in model.named_parameters():
                if "embedding" in name:
                    p.normal_(0, 0.5)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    model.eval()
    with torch.no_grad():
        z, _, _ = model(features)
    return torch.sigmoid(z).view(-1), model.state_dict()


def _features(batch: int, seed: int) -> KeyedJaggedTensor:
    """One id per field and row, ids 1..vocab-1."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(1, v, (batch,), generator=g) for _, v in FIELDS])  # field-major
    return KeyedJaggedTensor(keys=[n for n, _ in FIELDS], values=values,
                             lengths=torch.ones(batch * len(FIELDS), dtype=torch.int32))


def test_model_inference_settings():
    features = _features(300, 4)
    base = dict(embedding_dim=8, easy_hidden_units=[32, 32], hard_hidden_units=[32, 32, 32])
    eager, state = _probabilities(ModelConfig(**base, inference="eager"), features)
    fused, _ = _probabilities(ModelConfig(**base), features, state)
    bf16, _ = _probabilities(ModelConfig(**base, inference_precision="bf16"), features, state)
    assert eager.std() > 1e-3  # the inputs matter
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-6)
    gap = (bf16 - eager).abs().max()
    assert 1e-6 < gap < 5e-3


def test_cli_precision_choices_are_the_configs():
    from typing import get_args

    from tf4ctr_dist.cli.serve import PRECISIONS
    from tf4ctr_dist.config import INFERENCE, INFERENCE_PRECISION
    from tf4ctr_dist.modules.mlp import INFERENCE_PATHS

    assert PRECISIONS == get_args(INFERENCE_PRECISION)
    assert INFERENCE_PATHS == get_args(INFERENCE)  # modules/ checks its argument without the config
