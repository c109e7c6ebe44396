"""The backbones' encoders besides the MLP: LR, FM, CrossNet, CrossNetV2, CIN, AutoInt, AFN.

Every encoder takes the pooled field embeddings flat, h (B, F*d) with the field blocks in field
order (what TF4CTR and MLPEncoder already pass), and returns (B, out_dim); the branch's logit head
(a Linear(out_dim, 1) held by TF4CTR) follows. Encoders with ``emits_logit = True`` return the
branch logit itself, (B, 1), and take no head (the builder passes nn.Identity). Encoders with
``uses_first_order = True`` are called as encoder(h, w) with w (B, F) the first-order weights of
the ids (one weight per id, held in the ``lr`` table set; see FIRST_ORDER_DIM).

TorchRec's modules are used where they compute the published layer: VectorCrossNet (DCN),
CrossNet and LowRankMixtureCrossNet (DCNv2). Everything else is written here; each class says why.
All of it is torch.fx-traceable (python loops over layer counts only, no data-dependent branches).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankMixtureCrossNet, VectorCrossNet

from tf4ctr_dist.modules.init import init_linear

# Columns of a first-order (LR) table. The weight of an id is column 0; the other columns are
# never read. Why not dim 1: fbgemm's fused table kernels (CPU and GPU, the path every sharded
# table takes) require embedding_dim % 4 == 0, and the LR tables must shard like the others.
# The padding adds 3 never-trained numbers per id; it changes no output and no gradient.
FIRST_ORDER_DIM = 4


def first_order_weights(values: torch.Tensor, num_fields: int) -> torch.Tensor:
    """The first-order weight of each field's id: (B, F*FIRST_ORDER_DIM) table values -> (B, F)."""
    return values.reshape(-1, num_fields, FIRST_ORDER_DIM)[:, :, 0]  # (B, F)


def _fields(h: torch.Tensor, num_fields: int, dim: int) -> torch.Tensor:
    return h.reshape(-1, num_fields, dim)  # (B, F*d) -> (B, F, d)


class NoEncoder(nn.Module):
    """No branch (DNN has one encoder): logit 0 for every sample. forward: h (B, D) -> (B, 1)."""

    out_dim = 1
    emits_logit = True
    uses_first_order = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.new_zeros(h.size(0), 1)


class LREncoder(nn.Module):
    """Logistic regression (Wide & Deep's wide part): sum_i w_i (+ b). forward(h, w) -> (B, 1).

    h is ignored; w (B, F) are the ids' first-order weights. bias=False as in FuxiCTR's WideDeep
    and xDeepFM, where the other branch's head carries the model's bias.
    """

    emits_logit = True
    uses_first_order = True
    out_dim = 1

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None

    def reset_parameters(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = w.sum(dim=1, keepdim=True)  # (B, 1)
        return out + self.bias if self.bias is not None else out


class FMEncoder(nn.Module):
    """Factorization machine (Rendle 2010), DeepFM's FM part: b + sum_i w_i + sum_{i<j} <e_i, e_j>.

    forward(h (B, F*d), w (B, F)) -> (B, 1). The pairwise term is computed as
    1/2 * sum_k ((sum_i e_ik)^2 - sum_i e_ik^2).
    Why not torchrec.modules.deepfm.FactorizationMachine: it flattens its input to (B, F*d) and
    squares the sum over all F*d entries, which adds the cross-dimension products e_ik * e_jl
    (k != l): not the FM of the paper (nor of FuxiCTR), whose sum runs over fields per dimension.
    """

    emits_logit = True
    uses_first_order = True
    out_dim = 1

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.bias = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        e = _fields(h, self.num_fields, self.embedding_dim)  # (B, F, d)
        s = e.sum(dim=1)  # (B, d)
        pairwise = 0.5 * (s * s - (e * e).sum(dim=1)).sum(dim=1, keepdim=True)  # (B, 1)
        return pairwise + w.sum(dim=1, keepdim=True) + self.bias


class _TorchRecCross(nn.Module):
    """Holds one of TorchRec's cross networks and re-initialises its parameter lists the way
    TorchRec's constructors do (they have no reset_parameters, which `reset_dense` relies on)."""

    net: nn.Module

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                if name.startswith("bias"):
                    nn.init.zeros_(p)
                elif p.dim() >= 2 and "gates" not in name:
                    nn.init.xavier_normal_(p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # (B, D) -> (B, D)


class CrossEncoder(_TorchRecCross):
    """DCN's cross network (Wang et al. 2017): x_{l+1} = x_0 (x_l . w_l) + b_l + x_l.

    forward: h (B, D) -> (B, D), D = F*d; 2*D parameters per layer. TorchRec's VectorCrossNet.
    """

    uses_first_order = False
    emits_logit = False

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.net = VectorCrossNet(in_features=in_dim, num_layers=num_layers)
        self.out_dim = in_dim


class CrossV2Encoder(_TorchRecCross):
    """DCNv2's cross network (Wang et al. 2021). forward: h (B, D) -> (B, D), D = F*d.

    low_rank = 0: full rank, x_{l+1} = x_0 * (W_l x_l + b_l) + x_l (TorchRec's CrossNet; D*D + D
    per layer). low_rank = r > 0: the mixture of num_experts low-rank experts,
    x_0 * (U g(C g(V^T x_l)) + b_l) mixed by softmax gates (TorchRec's LowRankMixtureCrossNet with
    g = tanh, FuxiCTR's CrossNetMix; per layer 2*K*D*r + K*r*r + D, plus K*D for the gates when
    K > 1).
    """

    uses_first_order = False
    emits_logit = False

    def __init__(self, in_dim: int, num_layers: int, low_rank: int = 0, num_experts: int = 1) -> None:
        super().__init__()
        if low_rank < 0 or num_experts < 1:
            raise ValueError(f"crossv2 needs low_rank >= 0 and num_experts >= 1, got {low_rank}, {num_experts}")
        if low_rank == 0:
            self.net = CrossNet(in_features=in_dim, num_layers=num_layers)
        else:
            self.net = LowRankMixtureCrossNet(
                in_features=in_dim, num_layers=num_layers, num_experts=num_experts, low_rank=low_rank,
                activation=torch.tanh)
        self.out_dim = in_dim


class CINEncoder(nn.Module):
    """xDeepFM's compressed interaction network (Lian et al. 2018), without its output layer.

    X^0 = e (B, F, d); X^k_h = sum_{i, j} W^k_{h, i, j} X^0_i * X^{k-1}_j + b^k_h (H_k feature maps);
    p^k = sum over d of X^k (B, H_k). forward: h (B, F*d) -> concat_k p^k (B, sum_k H_k).
    The branch head is CIN's output Linear. Written here: TorchRec has no CIN. Layer k is a
    Linear(F*H_{k-1} -> H_k) with bias, the same parameters as the paper's 1x1 convolution.
    """

    uses_first_order = False
    emits_logit = False

    def __init__(self, num_fields: int, embedding_dim: int, layer_units: Sequence[int]) -> None:
        super().__init__()
        if not layer_units or any(u < 1 for u in layer_units):
            raise ValueError(f"cin needs a non-empty list of positive layer sizes, got {list(layer_units)}")
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        prev = [num_fields] + list(layer_units[:-1])
        self.layers = nn.ModuleList(
            init_linear(nn.Linear(num_fields * p, u)) for p, u in zip(prev, layer_units))
        self.out_dim = sum(layer_units)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x0 = _fields(h, self.num_fields, self.embedding_dim)  # (B, F, d)
        b = x0.size(0)
        xk = x0
        pooled = []
        for layer in self.layers:
            z = torch.einsum("bid,bjd->bijd", x0, xk)  # (B, F, H_{k-1}, d)
            z = z.reshape(b, -1, self.embedding_dim).transpose(1, 2)  # (B, d, F*H_{k-1})
            xk = layer(z).transpose(1, 2)  # (B, H_k, d)
            pooled.append(xk.sum(dim=2))  # (B, H_k)
        return torch.cat(pooled, dim=1)  # (B, sum H_k)


class SelfAttentionLayer(nn.Module):
    """AutoInt's interacting layer (Song et al. 2019): multi-head self-attention over the fields,
    residual, ReLU. forward: x (B, F, in_dim) -> (B, F, attention_dim).

    Q, K, V = x W_q, x W_k, x W_v (no bias), split into heads; out = concat_h softmax(Q_h K_h^T) V_h;
    y = relu(out + x W_res) (W_res only when in_dim != attention_dim, else x itself).
    Written here: torch's nn.MultiheadAttention adds biases and an output projection that AutoInt
    does not have (its parameter count and function differ), and TorchRec has no such layer.
    """

    def __init__(self, in_dim: int, attention_dim: int, num_heads: int, dropout: float = 0.0,
                 residual: bool = True, scale: bool = False, layer_norm: bool = False) -> None:
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim={attention_dim} is not divisible by attention_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.attention_dim = attention_dim
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale else 1.0
        self.w_q = init_linear(nn.Linear(in_dim, attention_dim, bias=False))
        self.w_k = init_linear(nn.Linear(in_dim, attention_dim, bias=False))
        self.w_v = init_linear(nn.Linear(in_dim, attention_dim, bias=False))
        self.w_res = (init_linear(nn.Linear(in_dim, attention_dim, bias=False))
                      if residual and in_dim != attention_dim else None)
        self.residual = residual
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.layer_norm = nn.LayerNorm(attention_dim) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, F, dh)

        q, k, v = heads(self.w_q(x)), heads(self.w_k(x)), heads(self.w_v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, H, F, F)
        attn = torch.softmax(scores, dim=-1)
        if self.dropout is not None:
            attn = self.dropout(attn)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, -1, self.attention_dim)  # (B, F, A)
        if self.residual:
            out = out + (self.w_res(x) if self.w_res is not None else x)
        if self.layer_norm is not None:
            out = self.layer_norm(out)
        return torch.relu(out)


class AttentionEncoder(nn.Module):
    """AutoInt's stack of interacting layers. forward: h (B, F*d) -> (B, F*attention_dim).

    The branch head is AutoInt's output Linear(F*attention_dim, 1).
    """

    uses_first_order = False
    emits_logit = False

    def __init__(self, num_fields: int, embedding_dim: int, num_layers: int, attention_dim: int,
                 num_heads: int, dropout: float = 0.0, residual: bool = True, scale: bool = False,
                 layer_norm: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"attention needs attention_layers >= 1, got {num_layers}")
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            SelfAttentionLayer(embedding_dim if i == 0 else attention_dim, attention_dim, num_heads,
                               dropout, residual, scale, layer_norm)
            for i in range(num_layers))
        self.out_dim = num_fields * attention_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = _fields(h, self.num_fields, self.embedding_dim)  # (B, F, d)
        for layer in self.layers:
            x = layer(x)  # (B, F, A)
        return x.flatten(1)  # (B, F*A)


class AFNEncoder(nn.Module):
    """AFN's logarithmic transformation layer (Cheng et al. 2020) and its MLP.

    y_j = exp(sum_i w_ji ln|e_i|) for L logarithmic neurons j (element-wise over d), with
    BatchNorm on ln|e| (over the fields) and on y (over the neurons), as in FuxiCTR's AFN;
    |e| is clamped at 1e-5 before the log (also FuxiCTR's choice; the paper says 1e-7).
    forward: h (B, F*d) -> mlp(flatten(y)) (B, mlp.out_dim); `mlp` maps L*d to its hidden layers
    (AFN's dense layers), and the branch head is AFN's output layer.
    Written here: TorchRec has no AFN layer.
    """

    uses_first_order = False
    emits_logit = False

    def __init__(self, num_fields: int, embedding_dim: int, num_neurons: int, mlp: nn.Module) -> None:
        super().__init__()
        if num_neurons < 1:
            raise ValueError(f"afn needs afn_neurons >= 1, got {num_neurons}")
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.coefficients = init_linear(nn.Linear(num_fields, num_neurons, bias=False))
        self.log_batch_norm = nn.BatchNorm1d(num_fields)
        self.exp_batch_norm = nn.BatchNorm1d(num_neurons)
        self.mlp = mlp
        self.out_dim = mlp.out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e = _fields(h, self.num_fields, self.embedding_dim)  # (B, F, d)
        log_e = self.log_batch_norm(torch.log(torch.clamp(torch.abs(e), min=1e-5)))  # (B, F, d)
        y = torch.exp(self.coefficients(log_e.transpose(1, 2))).transpose(1, 2)  # (B, L, d)
        y = self.exp_batch_norm(y)
        return self.mlp(y.flatten(1))  # (B, L*d) -> (B, out_dim)


class WithFirstOrder(nn.Module):
    """A branch that adds the LR term to another encoder's logit (xDeepFM: LR + CIN).

    forward(h (B, D), w (B, F)) -> head(encoder(h)) + sum_i w_i (B, 1); `head` is the inner
    encoder's own Linear(out_dim, 1), so the branch takes no further head.
    """

    emits_logit = True
    uses_first_order = True
    out_dim = 1

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if getattr(encoder, "uses_first_order", False) or getattr(encoder, "emits_logit", False):
            raise ValueError(f"{type(encoder).__name__} already has a first-order term or a logit")
        self.encoder = encoder
        self.head = head

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(h)) + w.sum(dim=1, keepdim=True)
