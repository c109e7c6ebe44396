"""The backbones' encoders (modules/encoders.py): outputs against independent computations,
gradients, fx-traceability, and the baseline presets' parameter counts against FuxiCTR's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tf4ctr_dist.config import PRESETS_DIR, LossConfig, ModelConfig, load_config
from tf4ctr_dist.losses import reweighted_ce_loss
from tf4ctr_dist.model import Objective, tf4ctr
from tf4ctr_dist.modules.encoders import (
    FIRST_ORDER_DIM,
    AFNEncoder,
    AttentionEncoder,
    CINEncoder,
    CrossEncoder,
    CrossV2Encoder,
    FMEncoder,
    LREncoder,
)
from tf4ctr_dist.modules.mlp import MLPEncoder
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

F, D = 3, 4  # fields, embedding dim of the tiny inputs


def _emb(b: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, F * D, generator=g, dtype=torch.float64)  # (B, F*d)


def _randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero values in every parameter (biases start at 0), float64."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ---- outputs against independent computations -------------------------------------------------


def test_lr_is_the_sum_of_the_first_order_weights() -> None:
    w = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, 0.25]], dtype=torch.float64)
    out = LREncoder(bias=False)(_emb(2), w)
    assert out.tolist() == [[1.5], [0.5]]


def test_fm_is_lr_plus_the_pairwise_inner_products() -> None:
    h, w = _emb(), torch.randn(5, F, dtype=torch.float64)
    fm = _randomise(FMEncoder(F, D))
    e = h.view(5, F, D).numpy()
    pairs = np.array([[sum(e[b, i] @ e[b, j] for i in range(F) for j in range(i + 1, F))] for b in range(5)])
    expected = pairs + w.sum(1, keepdim=True).numpy() + fm.bias.item()
    np.testing.assert_allclose(fm(h, w).detach().numpy(), expected, rtol=1e-12)
    # ... which is 1/2 ((sum v)^2 - sum v^2) summed over the dimensions
    s = e.sum(1)
    half = 0.5 * (s * s - (e * e).sum(1)).sum(1, keepdims=True)
    np.testing.assert_allclose(pairs, half, rtol=1e-12)


def test_cross_layers_by_hand() -> None:
    h = _emb()
    cross = _randomise(CrossEncoder(F * D, num_layers=2))
    x0 = h.numpy()
    x = x0
    for layer in range(2):
        w = cross.net.kernels[layer].detach().numpy()[:, 0]  # (D,)
        b = cross.net.bias[layer].detach().numpy()[:, 0]
        x = x0 * (x @ w)[:, None] + b + x  # x_{l+1} = x_0 x_l^T w + b + x_l
    np.testing.assert_allclose(cross(h).detach().numpy(), x, rtol=1e-10)


def test_crossv2_full_rank_by_hand() -> None:
    h = _emb()
    cross = _randomise(CrossV2Encoder(F * D, num_layers=2))
    x0 = h.numpy()
    x = x0
    for layer in range(2):
        W = cross.net.kernels[layer].detach().numpy()
        b = cross.net.bias[layer].detach().numpy()[:, 0]
        x = x0 * (x @ W.T + b) + x
    np.testing.assert_allclose(cross(h).detach().numpy(), x, rtol=1e-10)


def test_crossv2_low_rank_mixture_by_hand() -> None:
    h = _emb()
    K, r = 2, 3
    cross = _randomise(CrossV2Encoder(F * D, num_layers=2, low_rank=r, num_experts=K))
    net = cross.net
    x0 = h.numpy()
    x = x0
    for layer in range(2):
        gates = np.stack([x @ net.gates[k].weight.detach().numpy()[0] for k in range(K)], 1)  # (B, K)
        g = np.exp(gates) / np.exp(gates).sum(1, keepdims=True)
        moe = 0.0
        for k in range(K):
            V = net.V_kernels[layer][k].detach().numpy()  # (r, D)
            C = net.C_kernels[layer][k].detach().numpy()  # (r, r)
            U = net.U_kernels[layer][k].detach().numpy()  # (D, r)
            b = net.bias[layer].detach().numpy()[:, 0]
            expert = x0 * (np.tanh(np.tanh(x @ V.T) @ C.T) @ U.T + b)
            moe = moe + g[:, k:k + 1] * expert
        x = moe + x
    np.testing.assert_allclose(cross(h).detach().numpy(), x, rtol=1e-10)


def test_cin_by_explicit_loops() -> None:
    h = _emb(3)
    units = [2, 3]
    cin = _randomise(CINEncoder(F, D, units))
    x0 = h.view(3, F, D).numpy()
    xk, hk = x0, F
    pooled = []
    for k, layer in enumerate(cin.layers):
        W = layer.weight.detach().numpy().reshape(units[k], F, hk)  # W[h, i, j]
        bias = layer.bias.detach().numpy()
        nxt = np.zeros((3, units[k], D))
        for b in range(3):
            for o in range(units[k]):
                for i in range(F):
                    for j in range(hk):
                        nxt[b, o] += W[o, i, j] * x0[b, i] * xk[b, j]
                nxt[b, o] += bias[o]
        xk, hk = nxt, units[k]
        pooled.append(xk.sum(2))
    np.testing.assert_allclose(cin(h).detach().numpy(), np.concatenate(pooled, 1), rtol=1e-10)
    assert cin.out_dim == 5


def _attention_by_hand(x, layer, heads: int) -> np.ndarray:
    q = x @ layer.w_q.weight.detach().numpy().T
    k = x @ layer.w_k.weight.detach().numpy().T
    v = x @ layer.w_v.weight.detach().numpy().T
    a = q.shape[-1]
    dh = a // heads
    out = np.zeros_like(q)
    for b in range(x.shape[0]):
        for hd in range(heads):
            s = slice(hd * dh, (hd + 1) * dh)
            scores = q[b, :, s] @ k[b, :, s].T  # (F, F)
            p = np.exp(scores - scores.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out[b, :, s] = p @ v[b, :, s]
    res = x @ layer.w_res.weight.detach().numpy().T if layer.w_res is not None else x
    return np.maximum(out + res, 0.0)


def test_attention_by_hand() -> None:
    h = _emb()
    enc = _randomise(AttentionEncoder(F, D, num_layers=2, attention_dim=6, num_heads=2))
    x = h.view(5, F, D).numpy()
    for layer in enc.layers:
        x = _attention_by_hand(x, layer, heads=2)
    np.testing.assert_allclose(enc(h).detach().numpy(), x.reshape(5, -1), rtol=1e-10)
    assert enc.layers[0].w_res is not None and enc.layers[1].w_res is None  # 4 -> 6, then 6 -> 6


def test_afn_logarithmic_layer_by_hand() -> None:
    h = _emb()
    L = 3
    afn = _randomise(AFNEncoder(F, D, L, MLPEncoder(L * D, [], dropout=0.0)))  # no dense layer
    afn.eval()  # BatchNorm with its running statistics, set here to known values
    with torch.no_grad():
        afn.log_batch_norm.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        afn.log_batch_norm.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    e = h.view(5, F, D).numpy()
    bn = afn.log_batch_norm
    lg = np.log(np.maximum(np.abs(e), 1e-5))
    lg = ((lg - bn.running_mean.numpy()[None, :, None]) / np.sqrt(bn.running_var.numpy()[None, :, None] + bn.eps)
          * bn.weight.detach().numpy()[None, :, None] + bn.bias.detach().numpy()[None, :, None])
    W = afn.coefficients.weight.detach().numpy()  # (L, F)
    y = np.exp(np.einsum("lf,bfd->bld", W, lg))
    bn2 = afn.exp_batch_norm
    y = (y / np.sqrt(1.0 + bn2.eps)) * bn2.weight.detach().numpy()[None, :, None] + bn2.bias.detach().numpy()[None, :, None]
    np.testing.assert_allclose(afn(h).detach().numpy(), y.reshape(5, -1), rtol=1e-9)


def test_reweighted_ce_by_hand() -> None:
    z = torch.tensor([0.5, -1.0, 2.0, 0.3])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0])
    expected = 0.0
    for zi, yi in zip([0.5, -1.0, 2.0], [1, 0, 0]):
        p = 1 / (1 + math.exp(-zi))
        weight = p ** 0.25 if yi else (1 - p) ** 0.25
        expected += -weight * (math.log(p) if yi else math.log(1 - p))
    assert reweighted_ce_loss(z, y, valid, beta=0.25).item() == pytest.approx(expected / 3, rel=1e-6)
    zg = z.clone().requires_grad_(True)
    reweighted_ce_loss(zg, y, valid, beta=0.25).backward()
    # the weight is detached: d/dz = weight * (p - y) / n
    p = torch.sigmoid(z)
    w = torch.where(y > 0, p, 1 - p) ** 0.25
    assert torch.allclose(zg.grad, w * (p - y) * valid / 3)


# ---- whole models: every backbone ---------------------------------------------------------------

FIELDS = [("a", 5), ("b", 7), ("c", 4)]
BACKBONES = ["dnn", "widedeep", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint_plus", "afn_plus"]
SMALL = ["hard_hidden_units=[8,8]", "easy_hidden_units=[8]", "afn_hidden_units=[8]", "afn_neurons=3",
         "cin_layer_units=[2,3]", "attention_dim=4", "attention_heads=2"]


def _features(b: int = 6) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randint(1, v, (b,), generator=g) for _, v in FIELDS])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[n for n, _ in FIELDS], values=values, lengths=torch.ones(b * len(FIELDS), dtype=torch.int64))


def _model(preset: str, *overrides: str):
    cfg = load_config(PRESETS_DIR / f"{preset}.yaml", list(overrides))
    torch.manual_seed(0)
    return tf4ctr(FIELDS, cfg.model, device="cpu"), cfg


@pytest.mark.parametrize("preset", BACKBONES)
@pytest.mark.parametrize("ssem", ["share", "ser"])
def test_gradients_reach_every_parameter(preset: str, ssem: str) -> None:
    # batch_norm off: a Linear bias right before BatchNorm cancels (its gradient is exactly 0)
    model, _ = _model(preset, *SMALL, f"ssem={ssem}", "embedding_dim=8", "net_dropout=0", "batch_norm=false")
    with torch.no_grad():  # 1e-4 embeddings would make every gradient tiny; and no zero biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    z, z_s, z_c = model(_features())
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]])
    Objective(LossConfig(loss="tf"))(z, z_s, z_c, y, torch.ones_like(y)).backward()
    # With ser, an easy branch that reads no embeddings (DNN's none, Wide & Deep's LR) leaves the
    # d/2 table set unused: those tables get no gradient (noted as a limitation).
    unused = "embedding." if ssem == "ser" and preset in ("dnn", "widedeep") else "-"
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("preset", BACKBONES)
def test_backbone_traces_with_torchrec_fx(preset: str) -> None:
    from torchrec.fx import symbolic_trace

    model, _ = _model(preset, *SMALL, "ssem=ser", "embedding_dim=8")
    model.eval()
    traced = symbolic_trace(model)
    kjt = _features()
    for got, want in zip(traced(kjt), model(kjt)):
        torch.testing.assert_close(got, want)


def test_ser_gives_the_simple_encoder_the_half_width_tables() -> None:
    model, _ = _model("deepfm", *SMALL, "ssem=ser", "embedding_dim=8")
    assert model.simple_encoder.embedding_dim == 4 and model.embedding.embedding_bag_configs()[0].embedding_dim == 4
    assert model.linear_embedding.embedding_bag_configs()[0].embedding_dim == FIRST_ORDER_DIM


def test_encoders_trace_with_torch_fx() -> None:
    for enc in [CrossEncoder(12, 2), CrossV2Encoder(12, 2), CrossV2Encoder(12, 2, 3, 2), CINEncoder(F, D, [2]),
                AttentionEncoder(F, D, 2, 4, 2), AFNEncoder(F, D, 2, MLPEncoder(8, [4], 0.0))]:
        enc.eval()
        h = _emb().float()
        torch.testing.assert_close(torch.fx.symbolic_trace(enc)(h), enc(h))


def test_default_model_is_todays_tf4ctr() -> None:
    torch.manual_seed(0)
    model = tf4ctr(FIELDS, ModelConfig(), device="cpu")
    assert type(model.simple_encoder) is MLPEncoder and type(model.complex_encoder) is MLPEncoder
    assert model.linear_embedding is None
    assert type(model.simple_head) is nn.Linear and model.simple_head.bias is not None


def test_unknown_encoder_and_bad_options_are_errors() -> None:
    from tf4ctr_dist.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="easy_encoder"):
        RunConfig().with_overrides(["easy_encoder=dcn"])
    with pytest.raises(ValueError, match="not divisible"):
        tf4ctr(FIELDS, RunConfig().with_overrides(["easy_encoder=attention", "attention_dim=5", "attention_heads=2"]).model)
    with pytest.raises(ValueError, match="first_order"):
        tf4ctr(FIELDS, RunConfig().with_overrides(["easy_encoder=fm", "first_order=easy"]).model)


# ---- preset parameter counts against FuxiCTR's model_zoo ------------------------------------------
# Hand-derived from FuxiCTR's definitions (model_zoo/*/src, fuxictr/pytorch/layers) for the preset's
# settings: V = total vocabulary, F fields, d = 16, MLP_Block with batch_norm (Linear + BN per layer).

V = sum(v for _, v in FIELDS)
NF = len(FIELDS)
DIM = 16
FLAT = NF * DIM  # D = F*d


def _mlp_block(in_dim: int, hidden: list[int], out: bool = True) -> int:
    """FuxiCTR MLP_Block(batch_norm=True): Linear(prev, h) + BN(h) per layer, + Linear(last, 1)."""
    n, prev = 0, in_dim
    for h in hidden:
        n += prev * h + h + 2 * h
        prev = h
    return n + (prev + 1 if out else 0)


DNN_H = [400, 400, 400]
PAD = (FIRST_ORDER_DIM - 1) * V  # the LR tables' 3 padding columns (fbgemm needs dim % 4 == 0)


def _fuxictr_count(preset: str) -> int:
    emb = V * DIM
    lr = V  # LogisticRegression: a 1-dim embedding per id
    if preset == "dnn":
        return emb + _mlp_block(FLAT, DNN_H)
    if preset == "widedeep":  # LR(use_bias=False) + MLP_Block(output_dim=1)
        return emb + lr + _mlp_block(FLAT, DNN_H)
    if preset == "deepfm":  # FM = LR(use_bias=True) + product_sum (no weights)
        return emb + lr + 1 + _mlp_block(FLAT, DNN_H)
    if preset == "dcn":  # CrossNet: 2*D per layer; fc on [cross, dnn]
        return emb + 3 * 2 * FLAT + _mlp_block(FLAT, DNN_H, out=False) + (FLAT + DNN_H[-1] + 1)
    if preset == "dcnv2":  # CrossNetV2: Linear(D, D) per layer; fc on [cross, dnn]
        return emb + 3 * (FLAT * FLAT + FLAT) + _mlp_block(FLAT, DNN_H, out=False) + (FLAT + DNN_H[-1] + 1)
    if preset == "xdeepfm":  # LR(no bias) + CIN (Conv1d(F*H_{k-1}, H_k, 1) per layer, fc) + DNN
        units, prev, cin = [16, 16, 16], NF, 0
        for u in units:
            cin += NF * prev * u + u
            prev = u
        return emb + lr + cin + sum(units) + 1 + _mlp_block(FLAT, DNN_H)
    if preset == "autoint_plus":  # W_q, W_k, W_v (+ W_res when dims differ), no biases; fc; DNN
        a, first = 32, 4 * DIM * 32
        return emb + first + 2 * 3 * a * a + (NF * a + 1) + _mlp_block(FLAT, DNN_H)
    if preset == "afn_plus":  # coefficient_W (F*L), BN(F), BN(L), dense MLP; DNN on its own table; fc(2, 1)
        L = 100
        return (2 * emb + NF * L + 2 * NF + 2 * L + _mlp_block(L * DIM, [400, 400, 400])
                + _mlp_block(FLAT, DNN_H) + 3)
    raise KeyError(preset)


# What differs from FuxiCTR, and why (everything else is equal):
DIFFERENCE = {
    "dnn": 0, "dcn": 0, "dcnv2": 0, "autoint_plus": 0,
    "widedeep": PAD, "deepfm": PAD, "xdeepfm": PAD,
    # AFN+: the preset shares one embedding between the branches (FuxiCTR gives the DNN its own,
    # -V*d), and fuses with wsf (two weights) where FuxiCTR has Linear(2, 1) (a redundant third bias).
    "afn_plus": -V * DIM - 1,
}


@pytest.mark.parametrize("preset", BACKBONES)
def test_preset_parameter_count_equals_fuxictr(preset: str) -> None:
    cfg = load_config(PRESETS_DIR / f"{preset}.yaml")
    model = tf4ctr(FIELDS, cfg.model, device="meta")
    got = sum(p.numel() for p in model.parameters())
    assert got == _fuxictr_count(preset) + DIFFERENCE[preset]
